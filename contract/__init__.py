"""The artifact contract every stage shares, torch-free.

What an exported model is and how to feed it: its metadata schema and validation, the errors,
the one audio reader (bytes or path -> mono float32 at the model's rate), file hashing, GPU and
TensorRT checks and defaults, and the TensorRT runtime used at serving time. Imports run one
way: service -> contract <- export <- train; nothing here imports train, export, service or torch.
"""
