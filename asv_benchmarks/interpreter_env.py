"""asv plugin: the interpreter asv runs in, as an environment named by its Python version.

``asv run --python=same`` records the interpreter's path as its Python version (here a nox
virtual environment inside the checkout), and publish charts each version as its own line:
the history splits whenever the checkout moves.  ``asv run -E interpreter:same`` runs the
benchmarks the same way but records ``python: 3.11`` and the environment
``interpreter-py3.11``, so results are keyed by machine name and Python version only.
Loaded through ``"plugins"`` in asv.conf.json.
"""

from asv.environment import ExistingEnvironment, get_env_name


class InterpreterEnvironment(ExistingEnvironment):
    tool_name = "interpreter"

    def __init__(self, conf, executable, requirements, tagged_env_vars):
        super().__init__(conf, executable, requirements, tagged_env_vars)
        version = "import sys; print('%d.%d' % sys.version_info[:2])"
        self._python = self.run(["-c", version]).strip()

    @property
    def name(self):
        return get_env_name(self.tool_name, self._python, {}, self._tagged_env_vars)
