"""llama.cpp's ggml weight types: our quantizers (types.py), their byte layouts (layout.py) and the GGUF
writer (writer.py)."""
