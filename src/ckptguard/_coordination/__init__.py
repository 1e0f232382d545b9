"""_coordination: private layer of ckptguard (see ckptguard/__init__.py)."""
