"""Deploy: export a checkpoint to the engines people serve with (GGUF for llama.cpp / Ollama / LM Studio)
and publish a checkpoint folder to the Hugging Face Hub."""
