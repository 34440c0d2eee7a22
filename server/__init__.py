"""Server: artifact loading, backends, batcher, gRPC servicers. Needs `nextchar[serve]`."""
