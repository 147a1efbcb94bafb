"""bitbasis: binary-basis LLM quantization into GGUF, and a CPU engine that runs it."""
__version__ = "0.1.0"


def __getattr__(name):
    # `bitbasis.Model` without importing the C library (cffi) on every `import bitbasis`
    if name in ("Model", "EngineError"):
        from . import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'bitbasis' has no attribute {name!r}")
