"""Integrations with training frameworks, one module each; none is imported by the package.

* ``adaptive_data.integrations.transformers``: the Hugging Face ``Trainer``
  (``pip install 'adaptive-data[transformers]'``).
* ``adaptive_data.integrations.lightning``: PyTorch Lightning (``pip install
  'adaptive-data[lightning]'``).

Importing one without its extra raises a ``ModuleNotFoundError`` that names the extra.
"""
