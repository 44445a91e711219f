"""Sphinx configuration: built offline (no intersphinx), warnings are errors (nox -s docs)."""

project = "convbasis"
author = "convbasis developers"
copyright = "2026, convbasis developers"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.doctest",
    "sphinx.ext.autosummary",
]
autodoc_member_order = "bysource"
autodoc_typehints = "none"
napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_rtype = False
exclude_patterns = ["_build", "figures/*.py"]
html_theme = "alabaster"
html_static_path = []
# MathJax is loaded by the browser when a page is opened; the build itself stays offline.
