"""Integrations of ctxpar with other libraries. Each lives in its own submodule and is
imported only on request, so ``import ctxpar`` never imports them:

- :mod:`ctxpar.integrations.transformers`: Hugging Face transformers (the
  ``transformers`` extra): a ctxpar attention function registered through
  ``transformers.AttentionInterface``, a batch-sharding helper and the CP-aware loss.
"""

__all__ = ["transformers"]
