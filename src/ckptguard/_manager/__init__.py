"""_manager: private layer of ckptguard (see ckptguard/__init__.py)."""
