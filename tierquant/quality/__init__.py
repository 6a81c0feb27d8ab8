"""Forward passes and what they measure: the eval and calibration windows, the
layer-streamed gpt-oss forward, KL statistics against a reference, and the damage of
each allocation group at each candidate precision (damage.json)."""
