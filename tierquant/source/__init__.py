"""Where the original model comes from: the Hugging Face Hub, the synthetic and trained
tiny gpt-oss written offline, their tokenizer, and the exact MXFP4 → bf16 export."""
