"""card: this run's metrics → data/card/README.md, the model card (ModelCard + template)."""

from pathlib import Path

from tierquant import __version__
from tierquant.config import Config, compose_defaults, config_dict, project_root
from tierquant.report.card import CardInputs, EvalText, SourceModel, build_card
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
        chips=dict(config.benchmark.chips),
        tierquant_version=__version__,
        eval_text=EvalText(
            source=config.eval.source,
            path=config.eval.path,
            repo_id=config.eval.repo_id,
            revision=config.eval.revision,
            files=config.eval.files,
            text_column=config.eval.text_column,
        ),
        provenance=build_provenance(
            config_dict(config), root=project_root(), defaults_of=compose_defaults
        ),
    )


if __name__ == "__main__":
    stage_main(run)()
