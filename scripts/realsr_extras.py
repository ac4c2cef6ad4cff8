"""webui entry: the RealSR controls of the Extras tab (logic in realsr_webui/extras.py)."""

from realsr_webui.extras import RealSRExtras  # noqa: F401 - the webui registers the class it finds here
