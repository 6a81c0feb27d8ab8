"""publish: data/model + data/card → the Hub. Dry run (data/publish.json) unless
`publish.push=true` with HF_TOKEN set: `python stages/publish.py publish.push=true`."""

from pathlib import Path

from tierquant.config import Config, config_dict, project_root
from tierquant.report.provenance import build_provenance
from tierquant.report.publish import Build, Target, publish
from tierquant.stage import stage_main


def run(config: Config) -> dict:
    """Write the dry-run receipt, or push data/model + the card (publish.push=true)."""
    pub = config.publish
    return publish(
        build=Build(
            model_dir=Path(config.paths.model),
            card_dir=Path(config.paths.card),
            validate=Path(config.paths.validate),
            model_name=config.model.name,
            recipe_name=config.recipe.name,
            tiers=dict(config.tiers),
            provenance=build_provenance(config_dict(config), root=project_root()),
        ),
        target=Target(
            repo_id=config.repo_id(),
            revision=pub.revision,
            private=pub.private,
            create_pr=pub.create_pr,
            tag=pub.tag,
            push=pub.push,
        ),
        receipt_path=Path(config.paths.publish),
    )


if __name__ == "__main__":
    stage_main(run)()
