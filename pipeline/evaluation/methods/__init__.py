"""Communication methods on the same items: the registry (registry.py), what a method is
(base.py), latent methods and their controls (latent.py), the runner and a task's result (run.py)."""
