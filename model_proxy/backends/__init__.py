"""Generation backends behind the ModelProxy (``base.GenerationBackend``)."""
