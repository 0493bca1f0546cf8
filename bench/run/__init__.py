"""The run layer: the run environment (Workspace), recipes, jobs and executors, the training
and attack stages, transfers with surrogates, outside models and the driver. Imports
the science and everything below it; reporting never imports it."""
