"""Rebuild plots/html/template.html: DVC's plots page with vega, vega-lite and vega-embed
inlined from pinned npm packages, so `dvc plots show` / `dvc plots diff` work offline.

    python plots/html/refresh.py                 # the versions in vendor.json
    python plots/html/refresh.py vega=5.33.1 vega-lite=5.23.0 vega-embed=6.29.0

Needs `npm` (it runs `npm pack <name>@<version>`, the registry's own client) and
writes template.html, vendor.json (versions, npm integrity, sha256 of each inlined
file) and LICENSE-<name> beside them. README.md says why and how.

DVC (dvc_render.html) fills `{plot_divs}` and `{refresh_tag}` and puts its renderers'
<script src="https://cdn.jsdelivr.net/..."> tags at `{scripts}`: the page below has no
`{scripts}`, so nothing is loaded from the network.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# name -> (file in the npm package, the package whose LICENSE is kept: vega's own
# tarball has none; vega-util@1.17.3, of the same vega/vega repository, has it)
FILES = {
    "vega": ("package/build/vega.min.js", ("vega-util", "1.17.3")),
    "vega-lite": ("package/build/vega-lite.min.js", None),
    "vega-embed": ("package/build/vega-embed.min.js", None),
}
PLACEHOLDERS = ("{plot_divs}", "{refresh_tag}", "{scripts}")

PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {{refresh_tag}}
    <title>DVC Plot</title>
    <!-- tierquant: plots/html/template.html, written by plots/html/refresh.py.
         vega, vega-lite and vega-embed inlined (see plots/html/README.md): no network. -->
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def _pack(name: str, version: str, workdir: Path) -> tuple[Path, str]:
    """`npm pack name@version` into `workdir`: the tarball and its npm integrity."""
    out = subprocess.run(
        ["npm", "pack", f"{name}@{version}", "--json", "--pack-destination", str(workdir)],
        check=True,
        capture_output=True,
        text=True,
    )
    info = json.loads(out.stdout)[0]
    return workdir / info["filename"], info["integrity"]


def _member(tarball: Path, member: str) -> bytes:
    with tarfile.open(tarball) as tar:
        f = tar.extractfile(member)
        if f is None:
            raise SystemExit(f"{tarball.name}: no {member}")
        return f.read()


def script_block(name: str, version: str, code: str) -> str:
    for bad in ("</script", "<!--", *PLACEHOLDERS):
        if bad in code:
            raise SystemExit(f"{name}@{version}: contains {bad!r}; cannot be inlined as is")
    return f'    <script data-vendored="{name}@{version}">\n{code}\n    </script>'


def main(argv: list[str]) -> int:
    manifest = json.loads((HERE / "vendor.json").read_text())
    versions = {p["name"]: p["version"] for p in manifest["packages"]}
    for arg in argv:
        name, _, version = arg.partition("=")
        if name not in FILES or not version:
            raise SystemExit(f"usage: refresh.py [{'|'.join(FILES)}=<version> ...]")
        versions[name] = version
    packages, blocks = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (member, license_from) in FILES.items():
            tarball, integrity = _pack(name, versions[name], Path(tmp))
            code = _member(tarball, member).decode("utf-8")
            blocks.append(script_block(name, versions[name], code))
            lic_name, lic_version = license_from or (name, versions[name])
            lic_tar = tarball if license_from is None else _pack(*license_from, Path(tmp))[0]
            (HERE / f"LICENSE-{name}").write_bytes(_member(lic_tar, "package/LICENSE"))
            packages.append(
                {
                    "name": name,
                    "version": versions[name],
                    "npm_integrity": integrity,
                    "file": member.removeprefix("package/"),
                    "sha256": hashlib.sha256(code.encode("utf-8")).hexdigest(),
                    "license": f"LICENSE-{name} (from {lic_name}@{lic_version})",
                }
            )
    (HERE / "template.html").write_text(PAGE.format(scripts="\n".join(blocks)), "utf-8")
    manifest["packages"] = packages
    (HERE / "vendor.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for p in packages:
        print(f"{p['name']}@{p['version']}: {p['file']} sha256 {p['sha256']}")
    print(f"wrote {HERE / 'template.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
