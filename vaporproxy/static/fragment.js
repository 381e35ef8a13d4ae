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

// Where sessionStorage is refused (some privacy settings), secrets live in
// this page only.
const memory = new Map();

// Take every fragment parameter named in `storage` ({name: storageName}) at
// once; a name present replaces the others' stored values (a key pasted
// after a share link is used instead of it).  Answers whether any was there.
export function takeSecrets(storage) {
  const params = new URLSearchParams(window.location.hash.replace(/^#/, ""));
  const given = Object.keys(storage).filter((name) => params.get(name));
  if (given.length) {
    for (const [name, storageName] of Object.entries(storage)) {
      const value = params.get(name);
      memory.set(storageName, value || null);
      try {
        if (value) sessionStorage.setItem(storageName, value);
        else sessionStorage.removeItem(storageName);
      } catch (e) { /* memory only */ }
    }
    history.replaceState(null, "", window.location.pathname + window.location.search);
  }
  return given.length > 0;
}

// A secret taken by takeSecrets, or null.
export function secret(storageName) {
  try {
    const value = sessionStorage.getItem(storageName);
    if (value) return value;
  } catch (e) { /* memory only */ }
  return memory.get(storageName) || null;
}
