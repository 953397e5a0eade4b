# The types of kvscope's lazily imported names (kvscope/__init__.py resolves them on first use).
from kvscope.api import Run as Run
from kvscope.api import Serve as Serve
from kvscope.api import align as align
from kvscope.api import class_roofline as class_roofline
from kvscope.api import diff as diff
from kvscope.api import kv_math as kv_math
from kvscope.api import load_export as load_export
from kvscope.api import load_run as load_run
from kvscope.api import load_serve as load_serve
from kvscope.api import project as project
from kvscope.api import run as run
from kvscope.api import serve as serve
from kvscope.errors import KvscopeError as KvscopeError

__version__: str
__all__ = ["KvscopeError", "Run", "Serve", "__version__", "align", "class_roofline", "diff", "kv_math", "load_export",
           "load_run", "load_serve", "project", "run", "serve"]
