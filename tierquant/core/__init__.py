"""The checkpoint layer every stage stands on: files written atomically, safetensors
checkpoints read and written by the tensor, the MXFP4 and bf16 codecs, gpt-oss's names,
shapes and the float rows of the original, precisions and their byte sizes, the streams
work is spread over, and the one slice-wise affine quantize loop."""
