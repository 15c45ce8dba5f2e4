# Rules of the segment stage.
