"""A source checkout laid out as the installed package (pyproject's [tool.setuptools.package-dir]:
edgeseq/ plus exporters/, runtime/, kernels/, quant/ as edgeseq.exporters, ...), for a child's PYTHONPATH:
a pinned snapshot of HEAD (driver.snapshot_head, copied), or the checkout itself on a host where edgeseq
is not installed (the GPU host: no package index; linked)."""
from __future__ import annotations

import os
import shutil
import tomllib


def package_tree(src: str, dest: str, link: bool = False) -> str:
    with open(os.path.join(src, "pyproject.toml"), "rb") as f:
        dirs = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for name, d in sorted(dirs.items()):  # "edgeseq" first, then its subpackages inside it
        target = os.path.join(tmp, *name.split("."))
        if link:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if name == "edgeseq":
                os.makedirs(target)
                for entry in os.listdir(os.path.join(src, d)):
                    os.symlink(os.path.join(src, d, entry), os.path.join(target, entry))
            else:
                os.symlink(os.path.join(src, d), target)
        else:
            shutil.copytree(os.path.join(src, d), target, dirs_exist_ok=True)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest
