//! The web dashboard the admin listener serves at `/`: three static files compiled into
//! the binary (no CDN: it works offline). The page reads the same admin API as
//! everything else, with the same bearer token, so serving the files themselves needs
//! no token: they hold no data.

/// A static file of the dashboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asset {
    /// Its `Content-Type`.
    pub content_type: &'static str,
    /// Its bytes.
    pub body: &'static [u8],
}

/// The file served at `path`, if it is one of the dashboard's.
pub fn asset(path: &str) -> Option<Asset> {
    let (content_type, body): (_, &'static [u8]) = match path {
        "/" | "/index.html" => (
            "text/html; charset=utf-8",
            include_bytes!("dashboard/index.html"),
        ),
        "/dashboard.js" => (
            "text/javascript; charset=utf-8",
            include_bytes!("dashboard/dashboard.js"),
        ),
        "/dashboard.css" => (
            "text/css; charset=utf-8",
            include_bytes!("dashboard/dashboard.css"),
        ),
        _ => return None,
    };
    Some(Asset { content_type, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_its_own_files() {
        let page = std::str::from_utf8(asset("/").expect("index").body).expect("utf-8");
        for src in ["/dashboard.js", "/dashboard.css"] {
            assert!(page.contains(src), "{src}");
            assert!(asset(src).is_some(), "{src} is served");
        }
        assert!(
            !page.contains("http://") && !page.contains("https://"),
            "no CDN"
        );
        assert_eq!(asset("/nope"), None);
    }
}
