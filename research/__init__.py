"""An autograd-verified research testbed: a numpy MLP with handwritten backprop, checked by JAX.

The package is in floors, each importing only from the floors below it:

- ``research.engine``: the numbers (spec, forward pass, handwritten backprop, optimizers, the
  in-place training step, BLAS helpers);
- ``research.data``: datasets through tensorflow-datasets (without TensorFlow);
- ``research.verify``: the independent JAX reference, gradcheck, the origin's per-sample port;
- ``research.experiment``: the field table, training, tracking (MLflow), studies (Optuna), rerun;
- ``research.bench`` and ``research.cli`` on top (``python -m research``).

Importing any of it changes nothing in the process's environment.
"""
