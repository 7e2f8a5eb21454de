"""nucleus-watcher: watch folders, wait until images are complete, upload them to Scale Nucleus."""

__version__ = "0.1.0"
