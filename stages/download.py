"""download: write data/original (synthetic tiny model, or a pinned Hub snapshot)."""

from tierquant.download import download
from tierquant.stage import stage_main

if __name__ == "__main__":
    stage_main(download)()
