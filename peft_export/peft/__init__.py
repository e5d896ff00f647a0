"""PEFT methods for SAM image encoders, block placement, and exact merge into plain weights."""
