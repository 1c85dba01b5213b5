"""Everything that crosses the network: the wire protocol, the device sync agent, the aggregator."""
