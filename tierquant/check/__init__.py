"""The quality gate: the model's structure against the plan, each tensor against its
source in the original, and KLD, top-1 and PPL against the reference."""
