// What both pages of cnnkit serve share: element lookup, and the bearer token the server may ask for.
"use strict";
const $ = (id) => document.getElementById(id);

function headers(extra) {
  const token = $("token").value || sessionStorage.getItem("cnnkit-token") || "";
  return token ? { ...extra, Authorization: "Bearer " + token } : { ...extra };
}

// A token typed in is kept for the session (both pages) and the page reloads what it shows.
function onToken(reload) {
  $("token").addEventListener("change", () => { sessionStorage.setItem("cnnkit-token", $("token").value); reload(); });
}
