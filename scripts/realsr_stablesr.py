"""webui entry: StableSR as an img2img script (logic in realsr_webui/stablesr.py and the core engine)."""

from realsr_webui.stablesr import StableSRScript  # noqa: F401 - the webui registers the class it finds here
