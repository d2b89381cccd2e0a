"""Sphinx configuration for the curvlin documentation.

Build (from the repository root), warnings as errors:

    python -m sphinx -W --keep-going -b html docs docs/_build/html

The build needs no network: intersphinx has no mappings and the theme ships its own assets.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Document the checkout this file belongs to, even if another curvlin is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import curvlin

# -- Project ------------------------------------------------------------------------------

project = "curvlin"
author = "curvlin developers"
copyright = "curvlin developers"
release = curvlin.__version__
version = ".".join(release.split(".")[:2])

# -- General ------------------------------------------------------------------------------

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
default_role = "code"

# -- autodoc / autosummary ----------------------------------------------------------------

# Pages for the entries of every ``autosummary`` directive with ``:toctree:`` are written at
# build time (docs/api/generated/, git-ignored). Only .rst sources are scanned for
# ``.. autosummary::``, so keep API listings in .rst files.
autosummary_generate = True
autosummary_generate_overwrite = True
# Types are stated in the numpydoc "Parameters"/"Returns" sections; annotations in the
# signatures would only repeat them (and ``Array`` is a plain alias of ``Any``).
autodoc_typehints = "none"
autodoc_member_order = "bysource"

# -- numpydoc -----------------------------------------------------------------------------

# Class pages list their members through the autosummary class template instead.
numpydoc_show_class_members = False
numpydoc_show_inherited_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
# A modest validation set: every documented object has a docstring with a one-line summary
# and a section layout numpydoc can parse. Failures are build warnings, hence errors with -W.
numpydoc_validate = True
numpydoc_validation_checks = {"GL08", "SS01", "GL07", "PR06"}
numpydoc_validation_exclude = {
    r"\.__init__$",
    r"\.__repr__$",
}

# -- MyST ---------------------------------------------------------------------------------

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# -- intersphinx --------------------------------------------------------------------------

# No mappings: fetching inventories needs the network, and builds must work offline.
# Add e.g. {"numpy": ("https://numpy.org/doc/stable/", None)} where a network is available.
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}

# -- HTML ---------------------------------------------------------------------------------

html_theme = "pydata_sphinx_theme"
html_title = f"curvlin {release}"
html_theme_options = {
    "navigation_depth": 3,
    "show_toc_level": 2,
    "header_links_before_dropdown": 6,
    "navbar_align": "left",
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
html_show_sourcelink = False
# MathJax is loaded by the reader's browser from Sphinx's default CDN address when a page
# with math is opened; nothing is fetched at build time. Point ``mathjax_path`` at a local
# copy to read the pages fully offline.
