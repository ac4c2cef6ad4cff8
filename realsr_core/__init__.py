"""realsr_core: host-agnostic real-world super-resolution (pure PyTorch, never imports ComfyUI)."""
