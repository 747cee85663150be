"""Offline training and evaluation of CoordTok."""
