"""The CoordTok inference service and the `coordtok` command."""
