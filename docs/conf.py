"""Sphinx configuration: built offline (no intersphinx; MathJax is served from ``_static``),
warnings are errors and every cross-reference must resolve (nox -s docs)."""

import importlib
import importlib.metadata
import sys
import types

from sphinx.domains.python import PyClasslike
from sphinx.util.nodes import make_refnode

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
# api.rst's autosummary tables generate one page per public name, documented as convbasis.<name>.
autosummary_generate = True
templates_path = ["_templates"]
napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_rtype = False
exclude_patterns = ["_build", "figures/*.py"]

nitpicky = True
# Words in numpydoc parameter types that name no object: "optional", descriptive types, and
# the quoted choices of ``{"dense", "conv"}``.
nitpick_ignore = [
    ("py:class", name)
    for name in ("optional", "array namespace", "callable", "path", "scalar array")
]
nitpick_ignore_regex = [("py:class", r'\{?"[^"]*"\}?')]
# Targets outside the package: no intersphinx offline, so they are shown unlinked.
EXTERNAL = {"dask", "jax", "numpy", "scipy", "torch", *sys.stdlib_module_names}

html_theme = "furo"
html_title = "convbasis"
# MathJax 3 from the sphinx-mathjax-offline wheel (docs extra), copied into _static/mathjax:
# formulas render with no network (furo ships its own assets).
_MATHJAX = importlib.metadata.distribution("sphinx-mathjax-offline").locate_file(
    "sphinx-mathjax-offline/static"
)
html_static_path = ["_static", str(_MATHJAX)]
mathjax_path = "mathjax/tex-chtml.js"
html_css_files = ["convbasis.css"]


def _lookup(path):
    """The object that the dotted ``path`` names (importing modules on the way), or ``None``."""
    parts = path.split(".")
    try:
        obj = importlib.import_module(parts[0])
        for i, name in enumerate(parts[1:], 2):
            if hasattr(obj, name):
                obj = getattr(obj, name)
            elif isinstance(obj, types.ModuleType):
                obj = importlib.import_module(".".join(parts[:i]))
            else:
                return None
    except ImportError:
        return None
    return obj


def _contexts(node):
    """Modules in which a relative reference is looked up: the current module, on a generated
    page also the module that defines the documented object, each with its parent packages,
    and last the package (a bare public name means the public object)."""
    modules = [node.get("py:module")]
    if node["refdoc"].startswith("generated/"):
        modules.append(
            getattr(_lookup(node["refdoc"].removeprefix("generated/")), "__module__", None)
        )
    contexts = []
    for module in filter(None, modules):
        parts = module.split(".")
        contexts += [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
    return [*contexts, "convbasis"]


def _documented(env):
    """Documented Python names by the id of the object each names, public names first."""
    by_id = {}
    for name in sorted(env.get_domain("py").objects, key=lambda name: name.count(".")):
        obj = _lookup(name) if name.startswith("convbasis") else None
        # Objects with an identity of their own: equal constants are not the same object.
        if callable(obj) or isinstance(obj, (types.ModuleType, property)):
            by_id.setdefault(id(obj), []).append(name)
    return by_id


_DOCUMENTED = {}


def _resolve(app, env, node, contnode):
    """Resolve a Python reference that Sphinx could not, by the object it names.

    An object may be documented under one name (``convbasis.attention``, api.rst;
    ``convbasis.multipole.kernel_shapes``) and referenced by another that names the same
    object (``convbasis.reference.attention``, ``convbasis.polynomial.degree_for``, a bare
    ``conv_attention`` in a submodule's docstring): link to the documented entry.  References
    into :data:`EXTERNAL` packages are shown as plain text.  Anything else still warns.
    """
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip(".~")
    if target.split(".")[0] in EXTERNAL:
        return contnode
    if not _DOCUMENTED:  # references are resolved after every page has been read
        _DOCUMENTED.update(_documented(env))
    objects = env.get_domain("py").objects
    for path in [target, *(f"{context}.{target}" for context in _contexts(node))]:
        obj = _lookup(path) if path.startswith("convbasis") else None
        for name in _DOCUMENTED.get(id(obj), ()) if obj is not None else ():
            entry = objects[name]
            return make_refnode(
                app.builder, node["refdoc"], entry.docname, entry.node_id, contnode, name
            )
    return None


class _ClassLike(PyClasslike):
    """``py:class`` that notes a class's canonical alias once.

    A class re-exported by a package is documented under two names (``convbasis.ConvBasis``
    and ``convbasis.conv.ConvBasis``), each naming the same canonical one: the second alias is
    no second definition, so it must not warn as a duplicate.
    """

    def add_target_and_index(self, name_cls, sig, signode):
        entry = self.env.get_domain("py").objects.get(self.options.get("canonical"))
        if entry is not None and entry.aliased:
            del self.options["canonical"]
        super().add_target_and_index(name_cls, sig, signode)


def setup(app):
    app.connect("missing-reference", _resolve)
    for directive in ("class", "exception"):
        app.add_directive_to_domain("py", directive, _ClassLike, override=True)
