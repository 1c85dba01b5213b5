"""The classroom attendance appliance: frames in, attendance records out."""

__version__ = "0.1.0"
