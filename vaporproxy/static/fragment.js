// A secret handed to a page in its URL fragment (#key=… or #share=…): kept
// in sessionStorage for this tab, removed from the address bar at once (so
// it is not left in history, bookmarks or screenshots), and only ever sent
// in an Authorization header.
"use strict";

export function takeFromFragment(name, storageName) {
  const params = new URLSearchParams(window.location.hash.replace(/^#/, ""));
  const value = params.get(name);
  if (value) {
    sessionStorage.setItem(storageName, value);
    history.replaceState(null, "", window.location.pathname + window.location.search);
  }
  return sessionStorage.getItem(storageName);
}
