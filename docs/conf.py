"""Sphinx configuration of fastadam's documentation.

Build: ``python -m sphinx -W --keep-going docs docs/_build/html`` (warnings are
errors; ``tests/test_docs.py`` runs the same build). Everything is local: no
intersphinx, no remote theme assets, so the build works offline.
"""

from __future__ import annotations

import fastadam

project = "fastadam"
author = "fastadam developers"
copyright = "fastadam developers"  # noqa: A001 (Sphinx's name)
release = version = fastadam.__version__

extensions = [
    "sphinx.ext.autodoc",
    "numpydoc",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
root_doc = "index"

# Every reference must resolve (the test build runs with -W).
nitpicky = True
# Names that docstrings mention in their types but that no page here documents.
nitpick_ignore_regex = [
    ("py:class", r"(numpy|torch|ml_dtypes)(\..*)?"),
]

# -- API reference ---------------------------------------------------------
# The types live in the docstrings (NumPy style); signatures stay readable.
autodoc_typehints = "none"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True}
# The methods are listed with autodoc's :members:, not numpydoc's tables.
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
# Checked on every public docstring during the build (a failure is a warning,
# and so an error under -W). GL08: no docstring; PR01/PR02: a parameter
# missing from, or unknown to, "Parameters"; PR04: a parameter without a type;
# RT01: a return value without "Returns"; SS01: no summary line.
numpydoc_validation_checks = {"GL08", "PR01", "PR02", "PR04", "RT01", "SS01"}
numpydoc_validation_exclude = {
    r"\.__init__$",  # documented on the class
    r"\.__getstate__$",
    r"\.__setstate__$",
    r"\.__repr__$",
}

# -- Markdown --------------------------------------------------------------
myst_enable_extensions = ["colon_fence"]
# BENCHMARKS.md links to its own sections by their GitHub anchors.
myst_heading_anchors = 4

# -- HTML --------------------------------------------------------------------
html_theme = "furo"
html_title = f"fastadam {release}"
html_static_path: list[str] = []
