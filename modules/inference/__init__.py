"""Using a trained model: inference folders and their interfaces, long-form and streaming transcription, export."""
