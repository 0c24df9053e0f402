"""Optional dependencies: import one, or stop with the one line that says how to install it."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, feature: str, *, error: type[Exception]) -> ModuleType:
    """Import `module` for `feature`, or raise `error` naming the `pip install` that provides it.

    `error` is the calling command's user-error class, so that its `main` prints the message as one line.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.partition(".")[0]
        raise error(f'{feature} needs the {package} package: pip install "gptrain[{extra}]"') from None
