"""ImageService: references, registry client, content store, layer unpacking into overlay snapshots."""
