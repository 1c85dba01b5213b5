"""Releases on the device: verify, install, switch, trial, confirm or revert (manager), and
fetch the release the aggregator names for this device (updater)."""
