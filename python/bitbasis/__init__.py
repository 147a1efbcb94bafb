"""bitbasis: binary-basis LLM quantization into GGUF, and a CPU engine that runs it."""
__version__ = "0.1.0"
