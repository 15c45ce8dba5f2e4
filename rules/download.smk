# Rules of the download stage.
