fn main() { let t = std::thread::spawn(|| 5); println!("hi {}", t.join().unwrap_or(0)); }
