"""The stream runtime under every consuming worker (see ``pipeline.runtime.loop``)."""
