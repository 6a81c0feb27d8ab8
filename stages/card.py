"""card: this run's metrics → data/card/README.md, the model card (ModelCard + template)."""

from pathlib import Path

from tierquant import __version__
from tierquant.config import Config, compose_defaults, config_dict, project_root
from tierquant.report.card import CardInputs, Rounding, SourceModel, TextSource, build_card
from tierquant.report.pareto import POINTS
from tierquant.report.provenance import build_provenance
from tierquant.stage import stage_main


def run(config: Config) -> Path:
    """Render the model card (and its speed chart) from this run's files."""
    paths, model = config.paths, config.model
    return build_card(
        out=Path(paths.card),
        inputs=CardInputs(
            size_metrics=Path(paths.size_metrics),
            plan_dir=Path(paths.plan),
            model_dir=Path(paths.model),
            validate=Path(paths.validate),
            benchmark_dir=Path(paths.benchmark),
            machine=Path(paths.machine),
            predicted=Path(paths.predict),
            sweep=Path(paths.sweep) / POINTS,
        ),
        repo_id=config.repo_id(),
        source=SourceModel(
            name=model.name,
            base_model=model.repo_id if model.source == "hub" else None,
            revision=model.revision,
            license=model.license,
            trained=model.source == "synthetic"
            and model.synthetic is not None
            and model.synthetic.weights == "trained",
        ),
        recipe_name=config.recipe.name,
        group_size=config.quant.group_size,
        rounding=Rounding(
            method=config.quant.rounding,
            calibration_text=_text(config.calibration).describe(),
            calibration_windows=config.calibration.num_windows,
            window_length=config.calibration.window_length,
        ),
        chips=dict(config.benchmark.chips),
        tierquant_version=__version__,
        eval_text=_text(config.eval),
        provenance=build_provenance(
            config_dict(config), root=project_root(), defaults_of=compose_defaults
        ),
    )


def _text(section) -> TextSource:
    """params `eval` or `calibration`: which text it reads."""
    return TextSource(
        source=section.source,
        path=section.path,
        repo_id=section.repo_id,
        revision=section.revision,
        files=section.files,
        text_column=section.text_column,
    )


if __name__ == "__main__":
    stage_main(run)()
