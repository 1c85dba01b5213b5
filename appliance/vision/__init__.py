"""Vision stack: BlazeFace detection, dlib alignment + 128-d embedding, face quality, enrollment."""
