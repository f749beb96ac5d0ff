"""vlrm: fine-tune image captioners with RL, using vision-language models as rewards.

The engine never imports a plugin or a heavy model library at import time.
"""

from vlrm.hookspecs import hookimpl

__all__ = ["hookimpl", "__version__"]
__version__ = "0.1.0"
