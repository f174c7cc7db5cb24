//! Attacks through the domain: inline names, amplifying Directory blobs, half-finished uploads, ranged reads.
