"""stable-diffusion-webui (Forge, AUTOMATIC1111) adapters over ``realsr_core``; imported only inside the webui.

The webui loads ``scripts/*.py`` with the extension's folder on ``sys.path``; those files import from here.
"""
