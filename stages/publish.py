"""publish: data/model + data/card → the Hub. Dry run (data/publish.json) unless
`publish.push=true` with HF_TOKEN set: `python stages/publish.py publish.push=true`."""

from tierquant.publish import publish
from tierquant.stage import stage_main

if __name__ == "__main__":
    stage_main(publish)()
